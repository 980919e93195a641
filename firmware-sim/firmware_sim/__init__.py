"""Simulated device fleets for load tests, benchmarks and demos of the hub.

Layer: firmware simulator; imports the hub core (codecs, registry, settings,
storage) only, never bridges or tasks.

The `firmware-sim` command (`firmware_sim.cli`) runs fleets over TCP or MQTT;
the same is importable as an async API: `firmware_sim.fleet.run_tcp_fleet`,
`run_mqtt_fleet`, `run_tcp_device`, `run_mqtt_device`, and the device classes
`firmware_sim.tcp_device.TcpDevice` and `firmware_sim.mqtt_device.MqttDevice`.
"""
