"""The four stages of a run, one module each: tile -> embed -> cluster -> export.

Each stage is a function of the config and a :class:`settlements.store.Workspace`: it reads the
artifacts of the stages before it from the work folder and writes its own (staged until the run's
commit). The order, the lock, "nothing to do" and the commit are :mod:`settlements.pipeline`'s.

Modules are imported one by one, never from here: the tile stage (and ``validate``) needs no torch,
FAISS or matplotlib.
"""
