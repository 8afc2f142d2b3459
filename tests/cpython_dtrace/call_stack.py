# The call stack case, after CPython's test_dtrace: function__entry and
# function__return with CPython's three arguments for every way of calling a
# Python function (CALL, CALL_KW, CALL_FUNCTION_EX), nested calls, code after a
# return and a branch compiled away. Line numbers are part of the expected
# output (call_stack.bt.expected): edit with care.


def leaf(first, second):
    return first + second


def middle():
    return leaf(1, 2)


def outer():
    total = middle()
    return total


def keywords(**options):
    return len(options)
    return -1  # never reached


def unpacking(first, second, **rest):
    if False:
        return 0  # compiled away
    return first


def start():
    middle()
    outer()
    leaf(3, 4)
    keywords(name="value")
    unpacking(*(1, 2), **{"extra": 3})


start()
