// A tiny assertion macro set for the C++ unit tests (no test framework to download). Not named CHECK: c10 has one.
#pragma once

#include <cstdio>
#include <cstdlib>

#define REQUIRE(cond)                                                               \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

#define REQUIRE_EQ(a, b) REQUIRE((a) == (b))

#define REQUIRE_THROWS(expr, exception_type)              \
  do {                                                    \
    bool thrown = false;                                  \
    try {                                                 \
      (void)(expr);                                       \
    } catch (const exception_type&) {                     \
      thrown = true;                                      \
    }                                                     \
    REQUIRE(thrown && #expr " throws " #exception_type); \
  } while (0)
