#!/usr/sbin/dtrace -Cs
/*
 * objnew.d	Count the instances created per Python class (and the file that
 *		defines the class). For macOS and illumos, uses DTrace and the
 *		probes of pydtrace-rs.
 *		UNTESTED: written to the contract of objnew.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs objnew.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace objnew` runs this program
 * for you and prints the classes with the most instances first.
 *
 * instance-new-start passes (classname, filename); the key puts the file
 * first, as the DTrace example this follows does.
 *
 * Output, for the tool: "@map<TAB>key...<TAB>value" lines at the end.
 */

#pragma D option quiet
#pragma D option strsize=256

dtrace:::BEGIN
{
	printf("Tracing Python instance creation... Hit Ctrl-C to end.\n");
}

python$target:::instance-new-start
{
	@instances[copyinstr(arg1), copyinstr(arg0)] = count();
}

dtrace:::END
{
	printa("@instances\t%s\t%s\t%@d\n", @instances);
}
