#!/usr/sbin/dtrace -Cs
/*
 * calls.d	Count Python function calls by file and function, and time them.
 *		For macOS and illumos, uses DTrace and the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of calls.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs calls.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace calls` runs this program
 * for you, can start a command traced from its first line (-c), and prints
 * a sorted table; it keeps the parts between "begin latency" and "end
 * latency" only with --latency, those between "begin native" and "end
 * native" only with --native, and those between "begin native_latency" and
 * "end native_latency" only with both.
 *
 * @calls counts entries per (file, function); a generator or coroutine counts
 * once per resume, since every resume is an entry. @time_ns sums the time from
 * each entry to its return, callees included: a recursive function counts its
 * nested calls again. Function names are co_qualname (Class.method).
 *
 * Each thread's stack is a depth and, per level, the frame's start time and
 * function. The process switches each probe on within about 20 ms of DTrace
 * enabling it, so an entry is pushed only once a return has been seen (live),
 * and a return pops only a frame of its own function. Frames entered before
 * tracing began return at depth 0 and are skipped.
 *
 * C functions (--native), as in calls.bt: @ccalls per (calling file, C
 * function's qualified name, calling line), @ctime_ns their time; the C
 * calls of a thread balance, so a return pops the top of their own stack.
 *
 * Output, for the tool: "@map<TAB>key...<TAB>value" lines at the end.
 */

#pragma D option quiet
#pragma D option strsize=256

dtrace:::BEGIN
{
	printf("Tracing Python function calls... Hit Ctrl-C to end.\n");
}

python$target:::function-entry
{
	@calls[copyinstr(arg0), copyinstr(arg3)] = count();
}

/* begin native */
python$target:::cfunction-entry
{
	@ccalls[copyinstr(arg0), copyinstr(arg3), arg2] = count();
}
/* end native */

/* begin latency */
python$target:::function-return
/self->depth > 0 && self->function[self->depth] == arg3/
{
	@time_ns[copyinstr(arg0), copyinstr(arg3)] = sum(timestamp - self->start[self->depth]);
	self->function[self->depth] = 0;
	self->start[self->depth] = 0;
	self->depth--;
}

python$target:::function-return
/self->depth == 0/
{
	live = 1;
}

python$target:::function-entry
/live/
{
	self->depth++;
	self->function[self->depth] = arg3;
	self->start[self->depth] = timestamp;
}
/* end latency */

/* begin native_latency */
python$target:::cfunction-return
/self->cdepth > 0/
{
	@ctime_ns[copyinstr(arg0), copyinstr(arg3), arg2] = sum(timestamp - self->cstart[self->cdepth]);
	self->cstart[self->cdepth] = 0;
	self->cdepth--;
}

python$target:::cfunction-return
/self->cdepth == 0/
{
	clive = 1;
}

python$target:::cfunction-entry
/clive/
{
	self->cdepth++;
	self->cstart[self->cdepth] = timestamp;
}
/* end native_latency */

dtrace:::END
{
	printa("@calls\t%s\t%s\t%@d\n", @calls);
/* begin latency */
	printa("@time_ns\t%s\t%s\t%@d\n", @time_ns);
/* end latency */
/* begin native */
	printa("@ccalls\t%s\t%s\t%d\t%@d\n", @ccalls);
/* end native */
/* begin native_latency */
	printa("@ctime_ns\t%s\t%s\t%d\t%@d\n", @ctime_ns);
/* end native_latency */
}
