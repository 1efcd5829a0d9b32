package overlay

import "testing"

func TestReleaserDue(t *testing.T) {
	const mb = 1 << 20
	tests := []struct {
		name   string
		floors []uint64 // heap in use after earlier releases
		now    heapSample
		want   bool
	}{
		{name: "first check releases", now: heapSample{inUse: 5 * mb}, want: true},
		{name: "idle at the floor", floors: []uint64{10 * mb}, now: heapSample{inUse: 12 * mb, free: 2 * mb}, want: false},
		{name: "a few MB freed but kept", floors: []uint64{10 * mb}, now: heapSample{inUse: 12 * mb, free: 6 * mb}, want: true},
		{name: "a burst left the heap above the floor", floors: []uint64{10 * mb}, now: heapSample{inUse: 80 * mb}, want: true},
		{name: "freed but not returned", floors: []uint64{10 * mb}, now: heapSample{inUse: 10 * mb, free: 40 * mb}, want: true},
		{name: "floor is the least of the recent releases", floors: []uint64{70 * mb, 10 * mb, 60 * mb}, now: heapSample{inUse: 40 * mb}, want: true},
		{name: "above a higher floor only", floors: []uint64{30 * mb}, now: heapSample{inUse: 36 * mb, free: 1 * mb}, want: false},
		{name: "a catalog that grew for good raises the floor",
			floors: []uint64{10 * mb, 200 * mb, 200 * mb, 200 * mb, 200 * mb, 200 * mb, 200 * mb, 200 * mb, 200 * mb},
			now:    heapSample{inUse: 204 * mb, free: 1 * mb}, want: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r releaser
			for _, f := range tc.floors {
				r.released(heapSample{inUse: f})
			}
			if got := r.due(tc.now); got != tc.want {
				t.Errorf("due(%+v) with floor %d = %v, want %v", tc.now, r.floor(), got, tc.want)
			}
		})
	}
}
