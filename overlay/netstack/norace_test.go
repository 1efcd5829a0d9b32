//go:build !race

package netstack

// raceEnabled: see race_test.go.
const raceEnabled = false
