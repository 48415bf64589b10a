"""What operators see: the metric catalogue, Ray metric objects built from it, and tracing."""
