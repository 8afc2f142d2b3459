#!/usr/sbin/dtrace -Cs
/*
 * gc.d		Garbage collections of a Python process: how many per generation,
 *		what they collected, and a histogram of their pause times.
 *		For macOS and illumos, uses DTrace and the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of gc.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs gc.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace gc` runs this program for
 * you and prints a table per generation.
 *
 * A pause is the time from gc-start to gc-done on the same thread, in
 * microseconds; automatic collections and gc.collect() alike. Collected counts
 * the collected plus uncollectable objects, as CPython reports it.
 *
 * Output, for the tool: "@map<TAB>key...<TAB>value" lines at the end, and a
 * histogram as "@map<TAB>key..." followed by DTrace's quantize table.
 */

#pragma D option quiet

dtrace:::BEGIN
{
	printf("Tracing Python garbage collections... Hit Ctrl-C to end.\n");
}

python$target:::gc-start
{
	self->start = timestamp;
	self->generation = arg0;
}

python$target:::gc-done
/self->start/
{
	this->us = (timestamp - self->start) / 1000;
	@pause_us[self->generation] = quantize(this->us);
	@pauses[self->generation] = count();
	@total_us[self->generation] = sum(this->us);
	@longest_us[self->generation] = max(this->us);
	@collected[self->generation] = sum(arg0);
	self->start = 0;
}

dtrace:::END
{
	printa("@pauses\t%d\t%@d\n", @pauses);
	printa("@total_us\t%d\t%@d\n", @total_us);
	printa("@longest_us\t%d\t%@d\n", @longest_us);
	printa("@collected\t%d\t%@d\n", @collected);
	printa("@pause_us\t%d\n%@d\n", @pause_us);
}
