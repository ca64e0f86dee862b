"""The node control plane: sources (files, Kubernetes, CNI) -> state -> the kernel plan and the proxy policy, the reconciler and workers."""
