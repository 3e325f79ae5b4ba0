# Cross-compiles custom_ops for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu
# (tools/install_cross_deps.sh installs it). Used by tests/test_neon_qemu.py:
#   cmake -S custom_ops -B build-arm -DCMAKE_TOOLCHAIN_FILE=custom_ops/cmake/aarch64-linux-gnu.cmake \
#         -DRBE_BUILD_TESTS=ON -DRBE_BUILD_ORT_OP=OFF -DRBE_BUILD_PYTHON=OFF
# CMAKE_SYSTEM_PROCESSOR = aarch64 is what makes CMakeLists.txt add gemm_neon.cc and RBE_HAVE_NEON.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(RBE_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the cross toolchain's binaries")
set(CMAKE_C_COMPILER "${RBE_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${RBE_CROSS_PREFIX}g++")

# Headers and libraries only from the target's tree; programs (cmake's own helpers) from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Executables are linked statically, so qemu-aarch64 runs them with no target sysroot (no -L needed).
# Only executables: a shared library (the ORT op, if someone builds it cross) cannot be -static.
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")
# Lets try_run and friends run target programs through the emulator.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64)
