"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2): model, validation, compile, evaluate.

Pure: takes mappings and strings, never paths or sockets. Raises `PolicyError` only at load or
compile time; evaluation is total.
"""
