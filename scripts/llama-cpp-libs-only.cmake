# Included by llama.cpp's own CMakeLists (CMAKE_PROJECT_llama.cpp_INCLUDE, set in scripts/install.sh)
# while llama-cpp-python builds it: llama-cpp-python forces llama.cpp's "common" library on, but
# Python loads only libllama and libggml; skipping common's ~25 heavy C++ units cuts the build.
set(LLAMA_BUILD_COMMON OFF)
