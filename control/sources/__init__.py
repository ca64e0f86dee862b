"""Where the agent learns what to enforce: files, Kubernetes, and the CNI plugin."""
