#!/usr/sbin/dtrace -Cs
/*
 * flow.d	Print Python function entries and returns as they happen, with
 *		each thread's call depth. For macOS and illumos, uses DTrace and
 *		the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of flow.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs flow.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace flow` runs this program
 * for you and indents each line by its depth; it keeps the parts between
 * "begin native" and "end native" only with --native.
 *
 * Columns: microseconds since tracing began, thread id, call depth, -> for an
 * entry (a call, or a generator or coroutine resuming) and <- for a return
 * (or a yield, or unwinding by an exception), the function (co_qualname), and
 * its file and line. With the native parts, calls of C functions show too,
 * marked [C], with the file and line that called them, as in flow.bt. A
 * return of a frame entered before tracing began shows
 * at depth 0. Entries show only once a return has been seen (live): the
 * process switches each probe on within about 20 ms of DTrace enabling it.
 * Output is per CPU buffer: lines of different threads may come out of order
 * (DTrace's default switchrate is 1 s).
 */

#pragma D option quiet
#pragma D option strsize=256
#pragma D option switchrate=10hz

dtrace:::BEGIN
{
	printf("Tracing Python function entries and returns... Hit Ctrl-C to end.\n");
	printf("%-12s %-7s %5s  %s\n", "TIME(us)", "TID", "DEPTH", "FUNCTION");
	began = timestamp;
}

python$target:::function-return
{
	live = 1;
	printf("%-12d %-7d %5d  <- %s (%s:%d)\n", (timestamp - began) / 1000, tid, self->depth,
	    copyinstr(arg3), copyinstr(arg0), arg2);
	self->depth -= self->depth > 0 ? 1 : 0;
}

/* begin native */
python$target:::cfunction-return
{
	live = 1;
	printf("%-12d %-7d %5d  <- %s [C] (%s:%d)\n", (timestamp - began) / 1000, tid, self->depth,
	    copyinstr(arg3), copyinstr(arg0), arg2);
	self->depth -= self->depth > 0 ? 1 : 0;
}
/* end native */

python$target:::function-entry
/live/
{
	self->depth++;
	printf("%-12d %-7d %5d  -> %s (%s:%d)\n", (timestamp - began) / 1000, tid, self->depth,
	    copyinstr(arg3), copyinstr(arg0), arg2);
}

/* begin native */
python$target:::cfunction-entry
/live/
{
	self->depth++;
	printf("%-12d %-7d %5d  -> %s [C] (%s:%d)\n", (timestamp - began) / 1000, tid, self->depth,
	    copyinstr(arg3), copyinstr(arg0), arg2);
}
/* end native */
