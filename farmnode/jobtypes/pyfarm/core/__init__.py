"""``pyfarm.core``: the pieces of PyFarm's core package that job types import."""
