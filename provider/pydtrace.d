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
	/*
	 * The aggregate probes: this provider's addition (docs/probes.md). While
	 * a consumer enables one of the first four, the process counts (and
	 * times) inside itself, with no event per call or line, and reports what
	 * it gathered through them at each flush: every second, when a tool asks
	 * (the exported array pydtrace_flush_requests), and at exit. Each
	 * report is what was gathered since the previous flush.
	 */
	/*
	 * (filename, funcname, lineno, qualname, calls): calls of one code
	 * object since the last flush; lineno is its entry line, as
	 * function__entry passes it. Generators count once per resume.
	 */
	probe aggregate__calls(char *, char *, int32_t, char *, int64_t);
	/*
	 * (filename, funcname, lineno, qualname, calls, time_ns): as
	 * aggregate__calls, and the time from each entry to its return, callees
	 * included, summed over the calls that returned.
	 */
	probe aggregate__time(char *, char *, int32_t, char *, int64_t, int64_t);
	/* (filename, funcname, lineno, qualname, count): how often one line of one code object started. */
	probe aggregate__lines(char *, char *, int32_t, char *, int64_t);
	/*
	 * (node, parent, filename, qualname, calls, time_ns): one node of the
	 * call tree (a Python stack; parent 0 is the root), its calls and the
	 * time from entry to return of those that returned, callees included.
	 * Node numbers stay the same while the tree is gathered.
	 */
	probe aggregate__node(int64_t, int64_t, char *, char *, int64_t, int64_t);
	/*
	 * (requester, dropped): a flush ended. Every flush fires it once with
	 * requester 0 (-1 for the exit flush) and dropped, the calls and lines
	 * not gathered since the last flush because a bound was reached
	 * (docs/probes.md); then once per tool that asked for it, with the
	 * tool's PID and dropped 0.
	 */
	probe aggregate__flush(int32_t, int64_t);
};
