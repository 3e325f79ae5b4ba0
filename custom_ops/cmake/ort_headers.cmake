# ONNXRUNTIME_INCLUDE_DIR for the op library and the C++ example: the given folder when it holds `header`,
# otherwise Debian's libonnxruntime-dev unpacked privately by tools/fetch_ort_headers.sh (the wheel ships no
# headers; the C API is versioned, so older headers work with the newer runtime).
set(RBE_FETCH_ORT_HEADERS "${CMAKE_CURRENT_LIST_DIR}/../../tools/fetch_ort_headers.sh")

function(rbe_find_ort_headers header fetch_dir)
  set(ONNXRUNTIME_INCLUDE_DIR "$ENV{ONNXRUNTIME_INCLUDE_DIR}" CACHE PATH "Folder holding ${header}")
  if(NOT ONNXRUNTIME_INCLUDE_DIR OR NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/${header}")
    message(STATUS "ONNXRUNTIME_INCLUDE_DIR not set: fetching headers from Debian's libonnxruntime-dev")
    execute_process(
      COMMAND bash "${RBE_FETCH_ORT_HEADERS}" ${fetch_dir}
      OUTPUT_VARIABLE fetched OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "Could not fetch the ONNX Runtime headers; set ONNXRUNTIME_INCLUDE_DIR")
    endif()
    set(ONNXRUNTIME_INCLUDE_DIR "${fetched}" CACHE PATH "Folder holding ${header}" FORCE)
  endif()
endfunction()
