"""Objects made four ways, for `python -m dtrace objnew`: what it counts and what it does not.

    python examples/objects.py
"""

import copy
import enum


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


class Config:
    """One instance, handed out again at every call."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance


def main():
    points = [Point(i, i) for i in range(100)]       # 100 calls, 100 new instances: counted
    copies = [copy.copy(p) for p in points[:10]]      # 10 new instances made by C code: not counted
    colors = [Color(1 + i % 2) for i in range(50)]    # 50 calls, no new instance: counted all the same
    configs = [Config() for _ in range(20)]           # 20 calls, 1 instance: counted 20 times
    return points, copies, colors, configs


if __name__ == "__main__":
    main()
