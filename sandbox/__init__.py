"""Local sandboxes and demos: pods in network namespaces, test peers (Kafka broker), the live demo. Never imported by the product."""
