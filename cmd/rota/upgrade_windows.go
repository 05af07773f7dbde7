package main

// upgradable: Windows has no descriptor inheritance of this kind.
const upgradable = false

func notifySystemd(string) {}
