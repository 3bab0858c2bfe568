"""Operations: the local stack of servers and worker that runs the flows (not a flow itself)."""

# The loggers whose records reach a flow run's Prefect logs (PREFECT_LOGGING_EXTRA_LOGGERS): the library's and
# the wiring's. flows/__init__.py sets it for runs started here; the stack's worker hands it to its flow runs,
# whose process imports prefect before it imports flows.
FLOW_RUN_LOGGERS = "lora_core,flows"
