"""ambasync: mirror Allen Mouse Brain Atlas ISH expression grids into MINC volumes."""

__version__ = "0.1.0"
