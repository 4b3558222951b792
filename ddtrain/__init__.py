"""ddtrain: data-parallel training of small networks, numpy/CuPy engine, MPI allreduce."""

__version__ = "0.1.0"
