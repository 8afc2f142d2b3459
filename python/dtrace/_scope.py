"""``dtrace.Scope``, in a module of its own so that ``import dtrace`` does not create the class:
``dtrace`` imports it on first use (its module ``__getattr__``)."""


class Scope:
    """The scope in force: which code fires the function and line probes.

    ``modules``: module names (each covers its submodules); ``files``: file path
    globs matched against ``co_filename``; ``tools``: the PIDs of the tools whose
    sessions set it (empty when it comes from ``PYDTRACE_SCOPE``).
    """

    __slots__ = ("modules", "files", "tools")
    __module__ = "dtrace"  # where it is documented and imported from

    def __init__(self, modules: tuple[str, ...], files: tuple[str, ...], tools: tuple[int, ...] = ()) -> None:
        self.modules = tuple(modules)
        self.files = tuple(files)
        self.tools = tuple(tools)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scope):
            return NotImplemented
        return (self.modules, self.files, self.tools) == (other.modules, other.files, other.tools)

    def __hash__(self) -> int:
        return hash((self.modules, self.files, self.tools))

    def __repr__(self) -> str:
        return f"Scope(modules={self.modules!r}, files={self.files!r}, tools={self.tools!r})"
