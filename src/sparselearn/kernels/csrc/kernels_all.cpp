// Every kernel family as one translation unit. PyTorch's headers take most of each file's compile
// time, so parsing them once (here, and once more in bindings.cpp, built in parallel) builds the
// extension in about half the time of one translation unit per file. The files stay separate for
// reading; each keeps its helpers in an anonymous namespace, so their names must not repeat
// across files.

#include "conv.cpp"
#include "dropout.cpp"
#include "layouts.cpp"
#include "linear.cpp"
#include "norm.cpp"
#include "pool.cpp"
