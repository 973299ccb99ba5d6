"""resnet-exp's packed launcher: several sweep jobs trained at once in one process."""
