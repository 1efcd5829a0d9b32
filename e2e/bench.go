//go:build bench

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// This file holds the non-test helpers of the benchmark suite (`make bench`, build tag bench): the
// report model, its table and JSON, the iperf3 and benchtool runners and the reference binaries.

// Measurement is one number of a benchmark run, with what it is compared against.
type Measurement struct {
	// Name is dotted, topology first: "single.tcp-1stream.service".
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
	// Ratios compare Value with reference measurements of the same run: Value / reference Value.
	Ratios []Ratio `json:"ratios,omitempty"`
	// Raw holds the tool's numbers the Value was taken from (iperf3 summary, benchtool result).
	Raw any `json:"raw,omitempty"`
	// CPU is the CPU time each daemon (agent, reference wireguard-go) used while the measurement
	// ran, in percent of one CPU; the clients' and servers' own use is in Raw where the tool reports it.
	CPU map[string]float64 `json:"cpuPercent,omitempty"`
	// Goal is the target the value is compared with, if the measurement has one.
	Goal *Goal `json:"goal,omitempty"`
}

// Goal is a target a measurement is printed beside: the table says whether this run met it. A
// missed goal is reported, it does not fail the run.
type Goal struct {
	// Text states the goal: "≤ 1 s", "≥ 0.5× nat.tcp-1stream.easy-easy".
	Text string `json:"text"`
	Met  bool   `json:"met"`
}

// Ratio is Value / Of's value.
type Ratio struct {
	Of    string  `json:"of"`
	Value float64 `json:"value"`
}

// Report is one run of the suite: what `make bench` prints as a table and writes as JSON.
type Report struct {
	Started time.Time   `json:"started"`
	Seconds float64     `json:"seconds"`
	Machine MachineInfo `json:"machine"`
	// Settings are the knobs this run was given (environment of scripts/bench.sh), if any.
	Settings     map[string]string `json:"settings,omitempty"`
	Measurements []*Measurement    `json:"measurements"`
	// Failures lists the measurements that could not be taken, with why.
	Failures []string `json:"failures,omitempty"`

	byName map[string]*Measurement
}

// MachineInfo says where the numbers were measured.
type MachineInfo struct {
	NProc     int    `json:"nproc"`
	CPU       string `json:"cpu"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"goVersion"`
	Iperf3    string `json:"iperf3"`
	Commit    string `json:"commit"`
	Date      string `json:"date"`
	// LoadStart and LoadEnd are /proc/loadavg's 1, 5 and 15 minute averages when the run started
	// and ended: a load near or above NProc means something else competed for the CPUs.
	LoadStart string `json:"loadStart"`
	LoadEnd   string `json:"loadEnd"`
}

// NewReport starts a report at now and reads the machine's description.
func NewReport() *Report {
	now := time.Now().UTC()
	return &Report{Started: now, Machine: machineInfo(now), byName: map[string]*Measurement{}}
}

// Add records m and computes its ratios against refs, which must have been added before (missing
// ones, whose measurement failed, are skipped).
func (r *Report) Add(m *Measurement, refs ...string) {
	for _, ref := range refs {
		if o, ok := r.byName[ref]; ok && o.Value != 0 {
			m.Ratios = append(m.Ratios, Ratio{Of: ref, Value: m.Value / o.Value})
		}
	}
	r.Measurements = append(r.Measurements, m)
	r.byName[m.Name] = m
}

// Fail records that a measurement could not be taken.
func (r *Report) Fail(name string, err error) {
	r.Failures = append(r.Failures, fmt.Sprintf("%s: %v", name, err))
}

// Finish records the run's duration and the load average at its end.
func (r *Report) Finish() {
	r.Seconds = time.Since(r.Started).Seconds()
	r.Machine.LoadEnd = loadAvg()
}

// WriteTable prints the measurements as an aligned table.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "\nedgewire benchmarks, %s, %d CPUs (%s), kernel %s, %s, commit %s\n",
		r.Machine.Date, r.Machine.NProc, r.Machine.CPU, r.Machine.Kernel, r.Machine.GoVersion, r.Machine.Commit)
	fmt.Fprintf(w, "load average (1, 5, 15 min): %s at start, %s at end; run took %.0f s\n",
		r.Machine.LoadStart, r.Machine.LoadEnd, r.Seconds)
	for _, k := range slices.Sorted(maps.Keys(r.Settings)) {
		fmt.Fprintf(w, "setting: %s=%s\n", k, r.Settings[k])
	}
	fmt.Fprintln(w, "ratio = value / value of the reference named (same run, same machine); daemon CPU in % of one CPU")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVALUE\tUNIT\tDAEMON CPU\tRATIO VS REFERENCE\tGOAL")
	for _, m := range r.Measurements {
		var ratios []string
		for _, rt := range m.Ratios {
			ratios = append(ratios, fmt.Sprintf("%.2f× %s", rt.Value, rt.Of))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, formatValue(m.Value), m.Unit, formatCPU(m.CPU), strings.Join(ratios, ", "), formatGoal(m.Goal))
	}
	tw.Flush()
	for _, f := range r.Failures {
		fmt.Fprintf(w, "FAILED: %s\n", f)
	}
}

func formatGoal(g *Goal) string {
	switch {
	case g == nil:
		return ""
	case g.Met:
		return g.Text + " (met)"
	default:
		return g.Text + " (MISSED)"
	}
}

// formatCPU lists the daemons that used at least 1% of a CPU, by name.
func formatCPU(cpu map[string]float64) string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(cpu)) {
		if cpu[name] >= 1 {
			parts = append(parts, fmt.Sprintf("%s %.0f%%", name, cpu[name]))
		}
	}
	return strings.Join(parts, ", ")
}

func formatValue(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// WriteFiles writes the report as dir/<UTC start time>.json and dir/latest.json and returns the
// first path.
func (r *Report) WriteFiles(dir string) (string, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", fmt.Errorf("encode report: %w", err)
	}
	b = append(b, '\n')
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("results directory: %w", err)
	}
	path := filepath.Join(dir, r.Started.Format("20060102T150405Z")+".json")
	for _, p := range []string{path, filepath.Join(dir, "latest.json")} {
		// Through a temporary file (ignored by git) so that a reader never sees half a report.
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			return "", fmt.Errorf("write %s: %w", tmp, err)
		}
		if err := os.Rename(tmp, p); err != nil {
			os.Remove(tmp)
			return "", fmt.Errorf("write %s: %w", p, err)
		}
	}
	return path, nil
}

func machineInfo(now time.Time) MachineInfo {
	mi := MachineInfo{
		NProc:     runtime.NumCPU(),
		GoVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		Date:      now.Format(time.RFC3339),
		LoadStart: loadAvg(),
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		mi.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				mi.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if out, err := exec.Command("iperf3", "--version").Output(); err == nil {
		mi.Iperf3 = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		mi.Commit = strings.TrimSpace(string(out))
	}
	return mi
}

// loadAvg returns the first three fields of /proc/loadavg ("" if unreadable).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// BenchBinaries are the programs the benchmarks run besides meshctl.
type BenchBinaries struct {
	// Benchtool is e2e/benchtool: echo server, request/response and connection-rate clients.
	Benchtool string
	// WireGuardGo is the reference wireguard-go, built from the module version go.mod requires, the
	// one the agent links.
	WireGuardGo string
	// EdgeMeshRef is e2e/edgemeshref: the EdgeMesh-style tunnel (libp2p streams over TCP, TLS, yamux).
	EdgeMeshRef string
}

// BuildBenchBinaries builds benchtool, wireguard-go and edgemeshref into dir.
func BuildBenchBinaries(dir string) (BenchBinaries, error) {
	b := BenchBinaries{
		Benchtool:   filepath.Join(dir, "benchtool"),
		WireGuardGo: filepath.Join(dir, "wireguard-go"),
		EdgeMeshRef: filepath.Join(dir, "edgemeshref"),
	}
	if err := goBuild(b.EdgeMeshRef, "github.com/edgewire/edgewire/e2e/edgemeshref"); err != nil {
		return b, err
	}
	if err := goBuild(b.Benchtool, "github.com/edgewire/edgewire/e2e/benchtool"); err != nil {
		return b, err
	}
	if err := goBuild(b.WireGuardGo, "golang.zx2c4.com/wireguard"); err != nil {
		return b, err
	}
	return b, nil
}

// BenchtoolResult is what benchtool rr and connrate print (see e2e/benchtool).
type BenchtoolResult struct {
	Mode     string  `json:"mode"`
	Target   string  `json:"target"`
	Count    int     `json:"count"`
	Errors   int     `json:"errors"`
	Seconds  float64 `json:"seconds"`
	PerSec   float64 `json:"perSec"`
	P50Micro float64 `json:"p50us"`
	P99Micro float64 `json:"p99us"`
}

// userHZ is the unit of utime and stime in /proc/<pid>/stat (USER_HZ, 100 on Linux).
const userHZ = 100

// ProcCPUSeconds returns the CPU time (user and system, all threads) process pid has used.
func ProcCPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count fields from after its closing parenthesis,
	// where field 3 (state) starts; utime and stime are fields 14 and 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	return float64(utime+stime) / userHZ, nil
}
