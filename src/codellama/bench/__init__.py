"""`codellama bench`: measured and predicted inference latency, throughput and memory."""
