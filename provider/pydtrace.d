/*
 * provider/pydtrace.d: the contract between pydtrace-rs and every consumer.
 *
 * Provider `python`, with CPython's probe names and argument layout
 * (CPython's Include/pydtrace.d), so that bpftrace and DTrace scripts,
 * bcc's tools and CPython's documentation examples work unchanged.
 * Changing anything here is a breaking change.
 *
 * The parser that reads this file (the dtrace-parser crate) takes only
 * unnamed `char *` and `[u]int{8,16,32,64,ptr}_t` arguments, so CPython's
 * C types are written in those: `int` as int32_t, `long` as int64_t and
 * `void *` as uintptr_t. The argument names stand in comments.
 *
 * Arguments 0 to 2 of every probe are what CPython passes (3.11, and 3.15
 * for the function probes); what this provider adds comes after them, so
 * scripts written for CPython's probes see the same values here.
 *
 * A `char *` argument points to a NUL-terminated UTF-8 string that stays
 * valid at least until the probe has returned; names that are not valid
 * UTF-8 (lone surrogates) are passed with the offending characters
 * replaced by U+FFFD.
 */

provider python {
	/*
	 * (filename, funcname, lineno, qualname): a Python frame starts or
	 * resumes. funcname is co_name, as CPython passes it; qualname
	 * (co_qualname, `Class.method`) is this provider's addition.
	 */
	probe function__entry(char *, char *, int32_t, char *);
	/* (filename, funcname, lineno, qualname): a Python frame returns, yields or unwinds. */
	probe function__return(char *, char *, int32_t, char *);
	/* (filename, funcname, lineno, qualname): a new line starts executing. */
	probe line(char *, char *, int32_t, char *);
	/* (generation): a garbage collection starts. */
	probe gc__start(int32_t);
	/* (collected): a garbage collection ends; collected plus uncollectable. */
	probe gc__done(int64_t);
	/* (classname, filename): instantiation of a Python class starts. */
	probe instance__new__start(char *, char *);
	/* (classname, filename): instantiation of a Python class ends. */
	probe instance__new__done(char *, char *);
	/* (classname, filename): deallocation of an instance starts. */
	probe instance__delete__start(char *, char *);
	/* (classname, filename): deallocation of an instance ends. */
	probe instance__delete__done(char *, char *);
	/* (modulename): the import system starts to find and load a module. */
	probe import__find__load__start(char *);
	/* (modulename, found): finding and loading ended; found is 1 or 0. */
	probe import__find__load__done(char *, int32_t);
	/* (event, args): an audit event; args is the address of its tuple. */
	probe audit(char *, uintptr_t);
	/*
	 * (filename, funcname, lineno, qualname): Python code calls a C
	 * function (a builtin function, a method descriptor, a builtin type,
	 * any callable that is not Python code). filename and lineno are the
	 * calling frame's co_filename and the calling line; funcname is the C
	 * function's __name__, qualname its qualified name (`len`, `math.sqrt`,
	 * `list.append`; docs/cfunction-probes.md). This provider's addition:
	 * CPython has no such probe.
	 */
	probe cfunction__entry(char *, char *, int32_t, char *);
	/*
	 * (filename, funcname, lineno, qualname): that C function returned or
	 * raised; the same arguments as its entry.
	 */
	probe cfunction__return(char *, char *, int32_t, char *);
};
