"""Prints which communicator world() picks and whether mpi4py got imported (mpiexec -n K)."""

import sys

from ddtrain.parallel import world

comm = world()
print(f"world {comm.rank}/{comm.size} {type(comm).__name__} mpi4py={'mpi4py' in sys.modules};", flush=True)
