package overlay

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory comes back to the kernel after load. The Go runtime returns freed heap to the kernel only
// slowly, and collects only when the heap grows: an agent that goes idle after a burst (a bulk
// transfer fills wireguard-go's buffer pool, a flood fills the DNS and flow tables) would keep that
// memory in its RSS until the runtime's two-minute forced collection and beyond. releaseMemory
// checks the heap every releaseCheck and, when it holds releaseSlack more than the agent's idle
// floor or has freeSlack freed but not returned, collects and returns everything free
// (debug.FreeOSMemory), at most once per releaseEvery. A catalog change asks for a release at once:
// the previous catalog and the parser's garbage are twice the live set. Each release also asks the
// holders of wireguard-go's standing batches of packet buffers to give their pages back (package
// trim), which the heap's accounting does not see.

const (
	releaseEvery = 2 * time.Second
	releaseCheck = 5 * time.Second
	releaseSlack = 8 << 20
	// freeSlack is how much freed heap may stay unreturned: the runtime's own scavenger returns
	// only what lies above the next collection's goal, which an idle agent never reaches.
	freeSlack = 4 << 20
	// floorWindow is how many releases the idle floor is the least of: a catalog that grows for
	// good raises the floor after that many releases.
	floorWindow = 8
)

// heapSample is the heap as runtime/metrics sees it.
type heapSample struct {
	inUse uint64 // objects and the unused parts of their spans
	free  uint64 // free and not yet returned to the kernel
}

// releaser decides when to release. It is used by one goroutine.
type releaser struct {
	floors [floorWindow]uint64 // heap in use right after the last releases
	n      int
}

// floor is the least heap in use after the recent releases (0 before the first).
func (r *releaser) floor() uint64 {
	if r.n == 0 {
		return 0
	}
	m := r.floors[0]
	for _, f := range r.floors[1:min(r.n, floorWindow)] {
		m = min(m, f)
	}
	return m
}

// due says whether h holds enough above the floor, or free, to be worth a release.
func (r *releaser) due(h heapSample) bool {
	return r.n == 0 || h.free > freeSlack || h.inUse > r.floor()+releaseSlack
}

// released records the heap right after a release.
func (r *releaser) released(h heapSample) {
	r.floors[r.n%floorWindow] = h.inUse
	r.n++
}

var heapMetrics = []string{
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/heap/free:bytes",
}

func readHeap(samples []metrics.Sample) heapSample {
	metrics.Read(samples)
	return heapSample{
		inUse: samples[0].Value.Uint64() + samples[1].Value.Uint64(),
		free:  samples[2].Value.Uint64(),
	}
}

// releaseMemory releases memory as described above until ctx is done, and counts the releases.
func (a *Agent) releaseMemory(ctx context.Context) {
	samples := make([]metrics.Sample, len(heapMetrics))
	for i, name := range heapMetrics {
		samples[i].Name = name
	}
	var r releaser
	tick := time.NewTicker(releaseCheck)
	defer tick.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.release:
		case <-tick.C:
			if !r.due(readHeap(samples)) {
				continue
			}
		}
		if wait := releaseEvery - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		debug.FreeOSMemory()
		if m := a.meshP.Load(); m != nil {
			m.trim.Request() // and the pages of wireguard-go's idle batches
		}
		last = time.Now()
		a.releases.Add(1)
		r.released(readHeap(samples))
	}
}

// releaseCount is how many times releaseMemory returned memory to the kernel.
func (a *Agent) releaseCount() uint64 { return a.releases.Load() }
