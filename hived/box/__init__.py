"""The box daemon: warm pools of cells on one bare-metal server."""
