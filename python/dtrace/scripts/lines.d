#!/usr/sbin/dtrace -Cs
/*
 * lines.d	Count the Python lines executed, by file, function and line number.
 *		For macOS and illumos, uses DTrace and the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of lines.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs lines.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace lines` runs this program
 * for you and prints the hottest lines first.
 *
 * The line probe fires each time a line starts executing: a loop's `for` line
 * counts once per iteration and once more to end the loop. It costs the most
 * of all probes (one event per line), so trace for a short while.
 *
 * Output, for the tool: "@map<TAB>key...<TAB>value" lines at the end.
 */

#pragma D option quiet
#pragma D option strsize=256

dtrace:::BEGIN
{
	printf("Tracing Python lines... Hit Ctrl-C to end.\n");
}

python$target:::line
{
	@lines[copyinstr(arg0), copyinstr(arg3), arg2] = count();
}

dtrace:::END
{
	printa("@lines\t%s\t%s\t%d\t%@d\n", @lines);
}
