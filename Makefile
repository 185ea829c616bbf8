# The two commands a newcomer needs (both install what is missing first):
#   make demo   the whole pipeline: Kafka + Redis + a worker, simulated traffic, live scores
#   make test   the test suite, integration tier included, against a real Kafka and Redis
.PHONY: demo test install up down

install:
	bash deploy/install.sh

demo: install
	.venv/bin/leadstream demo

test: install
	.venv/bin/leadstream up
	.venv/bin/python -m pytest

up: install
	.venv/bin/leadstream up

down:
	.venv/bin/leadstream down
