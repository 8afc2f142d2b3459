#!/usr/sbin/dtrace -Cs
/*
 * objdel.d	Time the deletion of Python instances, counting a cascade (an
 *		instance whose deletion deletes others) as one deletion, and
 *		print a power-of-two histogram of those times in nanoseconds.
 *		For macOS and illumos, uses DTrace and the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of objdel.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs objdel.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace objdel` runs this program
 * for you.
 *
 * instance-delete-start and -done fire around each deallocation, in pairs.
 * A per-thread level counts the open pairs: the outermost start takes the
 * time, the matching done records it, and nested pairs (the cascade) only
 * move the level. Finalizers of garbage cycles (__del__) run earlier, during
 * the collection, outside the pair. The done clauses come before the start
 * clauses, as in objdel.bt.
 *
 * Output, for the tool: a histogram as "@map<TAB>" followed by DTrace's
 * quantize table, and "@map<TAB>value" lines.
 */

#pragma D option quiet

dtrace:::BEGIN
{
	printf("Tracing Python instance deletion... Hit Ctrl-C to end.\n");
}

python$target:::instance-delete-done
/self->level == 1/
{
	@deletion_ns = quantize(timestamp - self->start);
}

python$target:::instance-delete-done
/self->level > 0/
{
	self->level--;
}

python$target:::instance-delete-start
/self->level == 0/
{
	self->start = timestamp;
}

python$target:::instance-delete-start
{
	self->level++;
	@instances = count();
}

dtrace:::END
{
	printa("@deletion_ns\t\n%@d\n", @deletion_ns);
	printa("@instances\t%@d\n", @instances);
}
