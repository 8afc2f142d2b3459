"""A recursive function called a known number of times: run() calls countdown(9) 30 times, 300
calls of countdown() in all.

A workload module for tests/tracing.py's Workload (``run(result)`` runs once a consumer is live;
the module is copied into the workload's directory as workload.py): tests/test_tools.py and
tests/test_aggregate.py count its calls exactly.
"""


def countdown(n):
    return 0 if n == 0 else countdown(n - 1)


def run(result):
    for _ in range(30):
        countdown(9)
