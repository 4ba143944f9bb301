# repmlp_rt::torch: LibTorch as an imported interface target, found through a Python
# interpreter's torch package (include/ and lib/ inside it). Used by the project's own build
# and by the installed package (repmlp_rtConfig.cmake), so a consumer gets LibTorch the same
# way. We do not use find_package(Torch): with a CUDA wheel it requires the CUDA toolkit
# (nvcc), which GPU machines with only a pip-installed torch lack. The runtime's CUDA path uses
# the device-generic c10 stream API, so it needs no CUDA headers either.
#
# repmlp_rt_find_torch(<python executable>) sets, in the caller's scope:
#   REPMLP_RT_TORCH_DIR, REPMLP_RT_TORCH_LIB_DIR, REPMLP_RT_TORCH_VERSION,
#   REPMLP_RT_TORCH_CUDA (the CUDA version, empty for a CPU-only torch)
# and creates the target repmlp_rt::torch once.
function(repmlp_rt_find_torch python)
  execute_process(
    COMMAND "${python}" -c
            "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.version.cuda or ''); print(torch.__version__)"
    OUTPUT_VARIABLE info
    RESULT_VARIABLE rc
    ERROR_VARIABLE err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "repmlp_rt: cannot import torch with ${python}: install torch==2.13.0 "
                        "there, or point Python3_EXECUTABLE at an interpreter that has it\n${err}")
  endif()
  string(REPLACE "\n" ";" info "${info}")
  list(GET info 0 torch_dir)
  list(GET info 1 cxx11_abi)
  list(GET info 2 cuda)
  list(GET info 3 version)
  set(lib_dir "${torch_dir}/lib")

  if(NOT TARGET repmlp_rt::torch)
    set(names torch torch_cpu c10)
    if(cuda)
      list(APPEND names torch_cuda c10_cuda)
    endif()
    set(libs "")
    foreach(name IN LISTS names)
      find_library(REPMLP_RT_TORCH_${name}_LIBRARY NAMES ${name} PATHS "${lib_dir}" NO_DEFAULT_PATH)
      if(NOT REPMLP_RT_TORCH_${name}_LIBRARY)
        message(FATAL_ERROR "repmlp_rt: lib${name}.so not found in ${lib_dir}")
      endif()
      list(APPEND libs "${REPMLP_RT_TORCH_${name}_LIBRARY}")
    endforeach()
    add_library(repmlp_rt::torch INTERFACE IMPORTED)
    target_include_directories(repmlp_rt::torch SYSTEM INTERFACE
      "${torch_dir}/include" "${torch_dir}/include/torch/csrc/api/include")
    target_compile_definitions(repmlp_rt::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${cxx11_abi})
    if(cuda)
      target_compile_definitions(repmlp_rt::torch INTERFACE REPMLP_RT_WITH_CUDA=1)
    endif()
    # --no-as-needed: libtorch.so (and torch_cuda) register operators and device hooks at
    # load time; nothing references their symbols directly.
    target_link_libraries(repmlp_rt::torch INTERFACE "-Wl,--no-as-needed" ${libs} "-Wl,--as-needed")
  endif()

  set(REPMLP_RT_TORCH_DIR "${torch_dir}" PARENT_SCOPE)
  set(REPMLP_RT_TORCH_LIB_DIR "${lib_dir}" PARENT_SCOPE)
  set(REPMLP_RT_TORCH_VERSION "${version}" PARENT_SCOPE)
  set(REPMLP_RT_TORCH_CUDA "${cuda}" PARENT_SCOPE)
endfunction()
