"""xsettle bus: wire contract v1 over Kafka."""
