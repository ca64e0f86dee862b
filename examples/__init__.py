"""The example policies and endpoints, shipped with the package so `membrane demo` runs from any directory."""
