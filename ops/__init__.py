"""Operations: the local stack of servers and worker that runs the flows (not a flow itself)."""
