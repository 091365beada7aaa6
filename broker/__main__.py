"""``python -m broker`` is ``brokerctl``."""

from broker.cli import main

main()
