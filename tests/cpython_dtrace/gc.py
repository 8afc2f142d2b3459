# The gc case, after CPython's test_dtrace: gc__start with the generation of
# each collection, gc__done with what it collected (collected plus
# uncollectable, as CPython passes it), for collections made while
# collect_cycles() runs. The collection before it leaves nothing behind.
import gc


def collect_cycles():
    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    ring = []
    ring.append(ring)
    del ring
    gc.collect(2)  # the list that held itself: one object
    first, second = {}, {}
    first["other"], second["other"] = second, first
    del first, second
    gc.collect(2)  # two dicts that held each other: two objects


gc.collect()
collect_cycles()
