//go:build race

package static

// raceEnabled is true when the tests run under the race detector, which slows parsing ~10×.
const raceEnabled = true
