"""Local sandboxes and demos: pods in network namespaces, test peers (Kafka broker, the Kubernetes API server double in apiserver/), the live demo. Never imported by the product."""
