// Helpers that make error messages (internal, not installed): every message quotes paths,
// bytes and shapes the same way, whichever file builds it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace c10 {
class Error;
}  // namespace c10

namespace repmlp_rt::detail {

// Appends `byte` as two lowercase hex digits.
void append_hex(std::string& out, unsigned char byte);

// A name read from a file (a record name) as printable ASCII: other bytes and '\' become \xNN.
std::string printable_ascii(const std::string& name);

// The first line of `text` that is not blank (all of `text` when none is).
std::string first_line(const std::string& text);

// c10::Error and loader messages carry backtraces and long explanations: the first
// meaningful line.
std::string clean_message(const std::string& message);
std::string clean_message(const c10::Error& error);

// "[1, 3, 224, 224]"
std::string shape_string(c10::IntArrayRef shape);

// numpy's names: "float32", "uint8", ...
std::string dtype_name(c10::ScalarType type);

}  // namespace repmlp_rt::detail
