# The line case, after CPython's older test_dtrace: the line probe, once for
# each line that starts to run in walk(), a loop with a branch taken every
# other time. Its own output starts with "#", which the test leaves out; each
# of its lines is written in one call, so that it stays whole beside the
# tracer's on a shared stdout. Line numbers are part of the expected output
# (line.bt.expected): edit with care.
import sys


def walk():
    total = 0
    sys.stdout.write(f"# start {total}\n")
    for step in range(3):
        total += step
        if step % 2:
            total *= 2
        else:
            total -= 1
        sys.stdout.write(f"# {step} {total}\n")
    sys.stdout.write(f"# end {total}\n")
    return total


if __name__ == "__main__":
    walk()
