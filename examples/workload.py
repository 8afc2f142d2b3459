"""A small program to trace: recursion, methods, a generator, garbage cycles.

    python examples/workload.py            # runs for about a second
    python examples/workload.py --rounds 5 # runs longer
"""

import argparse
import gc


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class Node:
    def __init__(self, parent=None):
        self.parent = parent
        self.children = []
        if parent is not None:
            parent.children.append(self)  # a cycle: child -> parent -> child

    def depth(self):
        return 0 if self.parent is None else 1 + self.parent.depth()


def squares(n):
    for i in range(n):
        yield i * i


def build_tree(width, depth, parent=None):
    node = Node(parent)
    if depth:
        for _ in range(width):
            build_tree(width, depth - 1, node)
    return node


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.rounds):
        fib(20)
        sum(squares(1000))
        tree = build_tree(3, 5)
        tree.children[0].children[0].depth()
        del tree
        gc.collect()


if __name__ == "__main__":
    main()
