"""Coverage-guided fuzzing (atheris) of what parses untrusted bytes.

Layer: tooling, beside `tests/` and `bench/`: imports the `hub` core, `bridges`
and the golden vectors of `tests/unit/protocol_vectors.py`; nothing imports it.

Targets (each a module of this package with one harness):

- `native`: the native codec, in the hub and in the device role;
- `lines`: the lines codec, in both roles;
- `mqtt`: the MQTT 3.1.1 rule book (`check_packet`) and the packet reader
  that frames a client's stream (`hub.mqtt_rules`, `bridges.mqtt.reader`).

The contract is h11's: bad input may only raise the codec's remote protocol
error (`RemoteProtocolError`; for MQTT, `ProtocolViolation` from the rules and
end of stream from the reader). Any other exception, a hang, or an event that
does not survive being encoded again is a finding. Run `python -m fuzz --help`;
docs/fuzzing.md explains the runs and the corpus.
"""
