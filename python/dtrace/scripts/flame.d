#!/usr/sbin/dtrace -Cs
/*
 * flame.d	Time spent per Python stack, from function entries and returns,
 *		for a flame graph. For macOS and illumos, uses DTrace and the
 *		probes of pydtrace-rs.
 *		UNTESTED: written to the contract of flame.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs flame.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace flame` runs this program
 * for you and draws the SVG (or prints folded stacks); it keeps the parts
 * between "begin native" and "end native" only with --native.
 *
 * As in flame.bt, stacks are aggregated in the kernel: a node stands for a
 * whole stack, a 62-bit hash of its parent node and the frame's file and
 * function pointers. The first entry of a node records its parent and names
 * in @names[node, parent, file, function]; each entry counts in @calls; each
 * return adds the time since its entry (callees included) to @time_ns. An
 * entry is pushed only once a return has been seen (live), and a return pops
 * only a frame of its own function.
 *
 * With the native parts, calls of C functions are frames too, as in
 * flame.bt: a C frame's node hashes its parent and the qualified name's
 * pointer, @native marks it, and its level's function is 1; a C return pops
 * the top frame if it is a C frame.
 *
 * Output, for the tool: "@map<TAB>key...<TAB>value" lines at the end.
 */

#pragma D option quiet
#pragma D option strsize=256

dtrace:::BEGIN
{
	printf("Tracing Python stacks for a flame graph... Hit Ctrl-C to end.\n");
}

python$target:::function-return
/self->depth > 0 && self->func[self->depth] == arg3/
{
	@time_ns[self->node[self->depth]] = sum(timestamp - self->start[self->depth]);
	self->depth--;
}

python$target:::function-return
/self->depth == 0/
{
	live = 1;
}

/* begin native */
python$target:::cfunction-return
/self->depth > 0 && self->func[self->depth] == 1/
{
	@time_ns[self->node[self->depth]] = sum(timestamp - self->start[self->depth]);
	self->depth--;
}

python$target:::cfunction-return
/self->depth == 0/
{
	live = 1;
}
/* end native */

python$target:::function-entry
/live/
{
	self->depth++;
	self->node[self->depth] = (((self->node[self->depth - 1] ^ arg0) * 1099511628211) ^ arg3)
	    * 1099511628211 & 0x3fffffffffffffff;
	self->func[self->depth] = arg3;
	self->start[self->depth] = timestamp;
	@calls[self->node[self->depth]] = count();
}

python$target:::function-entry
/live && !seen[self->node[self->depth]]/
{
	seen[self->node[self->depth]] = 1;
	@names[self->node[self->depth], self->node[self->depth - 1], copyinstr(arg0), copyinstr(arg3)] = count();
}

/* begin native */
python$target:::cfunction-entry
/live/
{
	self->depth++;
	self->node[self->depth] = (((self->node[self->depth - 1] ^ 0x43) * 1099511628211) ^ arg3)
	    * 1099511628211 & 0x3fffffffffffffff;
	self->func[self->depth] = 1;
	self->start[self->depth] = timestamp;
	@calls[self->node[self->depth]] = count();
}

python$target:::cfunction-entry
/live && !seen[self->node[self->depth]]/
{
	seen[self->node[self->depth]] = 1;
	@names[self->node[self->depth], self->node[self->depth - 1], "", copyinstr(arg3)] = count();
	@native[self->node[self->depth]] = count();
}
/* end native */

dtrace:::END
{
	printa("@time_ns\t%d\t%@d\n", @time_ns);
	printa("@calls\t%d\t%@d\n", @calls);
	printa("@names\t%d\t%d\t%s\t%s\t%@d\n", @names);
/* begin native */
	printa("@native\t%d\t%@d\n", @native);
/* end native */
}
