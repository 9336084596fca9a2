"""The data plane: client connections, their exchanges and tunnels, and what they share."""
