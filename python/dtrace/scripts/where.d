#!/usr/sbin/dtrace -Cs
/*
 * where.d	Print the Python stack (file:line function) each time a native
 *		function is called, here connect(). For macOS and illumos, uses
 *		DTrace and the probes of pydtrace-rs.
 *		UNTESTED: written to the contract of where.bt, which is tested.
 *
 * USAGE: sudo dtrace -Cs where.d -p PID
 *
 * The process must have the probes armed: `import dtrace` in the program, or
 * PYDTRACE=1 in its environment. `python -m dtrace where connect` runs this
 * program for you, with any native function in place of connect (NATIVE
 * below), and counts the stacks.
 *
 * CPython's own DTrace support had jstack() and a ustack helper; pydtrace-rs
 * has none, so this program keeps each thread's Python stack itself, as
 * where.bt does: an entry pushes the frame's file, function and line, a line
 * event moves the top frame's line, a return pops a frame of its own
 * function. An entry is pushed only once a return has been seen (live): the
 * process switches each probe on within about 20 ms of DTrace enabling it.
 * At each call of NATIVE the stack is printed, innermost frame first, at most
 * 100 frames: one clause per frame, since D has no loops (hence -C, the C
 * preprocessor). Below them, the frame that was running before tracing began
 * (known from a line event at depth 0) is printed as a "base" frame.
 */

#pragma D option quiet
#pragma D option defaultargs
#pragma D option strsize=256

#define NATIVE pid$target::connect:entry

dtrace:::BEGIN
{
	printf("Tracing Python stacks that call connect()... Hit Ctrl-C to end.\n");
}

python$target:::function-return
/self->depth > 0 && self->func[self->depth] == arg3/
{
	self->depth--;
}

python$target:::function-return
/self->depth == 0/
{
	live = 1;
	self->basefunc = 0;
}

python$target:::function-entry
/live/
{
	self->depth++;
	self->file[self->depth] = arg0;
	self->func[self->depth] = arg3;
	self->line[self->depth] = arg2;
}

/* begin lines */
python$target:::line
/self->depth > 0/
{
	self->line[self->depth] = arg2;
}

python$target:::line
/self->depth == 0/
{
	self->basefile = arg0;
	self->basefunc = arg3;
	self->baseline = arg2;
}
/* end lines */

NATIVE
/pid == $target/
{
	self->calls++;
	self->i = self->depth;
	self->n = 0;
	printf("stack %d %d %d\n", tid, self->calls, self->depth);
}

#define FRAME \
NATIVE \
/pid == $target && self->i > 0 && self->n < 100/ \
{ \
	printf("frame %d %d %d %d %s\n", tid, self->calls, self->n, \
	    self->line[self->i], copyinstr(self->file[self->i])); \
	printf("func %d %d %d %s\n", tid, self->calls, self->n, \
	    copyinstr(self->func[self->i])); \
	self->i--; \
	self->n++; \
}
#define TEN_FRAMES FRAME FRAME FRAME FRAME FRAME FRAME FRAME FRAME FRAME FRAME

TEN_FRAMES TEN_FRAMES TEN_FRAMES TEN_FRAMES TEN_FRAMES
TEN_FRAMES TEN_FRAMES TEN_FRAMES TEN_FRAMES TEN_FRAMES

/* begin lines */
NATIVE
/pid == $target && self->i == 0 && self->basefunc != 0/
{
	printf("base %d %d %d %s\n", tid, self->calls, self->baseline,
	    copyinstr(self->basefile));
	printf("basefunc %d %d %s\n", tid, self->calls, copyinstr(self->basefunc));
}
/* end lines */
