"""The scripts `ddtrain bench` runs, one process each, installed with the package.

Each is a module run as ``python -m ddtrain.benchmarks.NAME`` and prints one JSON line:
  numpy_loop    the hand-written numpy training loop (plain, buffers reused, bare mpi4py)
  torch_loop    the PyTorch loop (CPU, or CUDA for the gpu section)
  loop_common   what the two loops share, so they do exactly ddtrain's work
  products      the products-only limit: the step's 8 matrix products alone
  profile_step  one ddtrain step split into matmul, element-wise, optimizer, data,
                communication and Python
  allreduce     the gradient reduction against a bare mpi4py Allreduce (2 ranks)
  mpich_algorithms  MPICH's allreduce algorithms on the same buffer (2 ranks, one node)
  gemm_libraries  the mlp's 8 products through numpy's OpenBLAS, PyTorch (MKL) and MKL
                directly, where Intel's mkl wheel is installed (not run by `ddtrain bench`)
  cnn           ddtrain's CNNs against PyTorch, one BLAS thread, batch 128 (prints a table;
                its figures go to the file given as --json)
"""
