package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// KubeAPI is a real Kubernetes API server (kube-apiserver backed by etcd, both built from the Go
// module proxy by scripts/go-tools.sh k8s) running in the root namespace and listening on an address
// that AttachRoot gave it, so that agents in the lab's namespaces reach it. No controller-manager
// and no kubelet run: tests create Nodes and EndpointSlices themselves.
//
// The test talks to it as the admin (a static token in the system:masters group); agents get the
// token of a ServiceAccount, so RBAC applies to them.
type KubeAPI struct {
	// URL is the API server's https URL.
	URL string
	// CA is the PEM certificate the serving certificate is signed by.
	CA []byte

	lab        *Lab
	dir        string
	bins       string
	addr       netip.Addr
	port       int
	etcdURL    string
	adminToken string
	client     *http.Client
	etcd       *Proc
	apiserver  *Proc
}

// KubeTools returns the directory holding kube-apiserver and etcd, building them on first use.
func KubeTools(t testing.TB) string {
	t.Helper()
	return GoTools(t, "k8s", "kube-apiserver", "etcd")
}

// StartKubeAPI starts etcd and kube-apiserver listening on addr (an address of the root namespace,
// see LAN.AttachRoot) and waits until the API server is ready. serviceRange is its
// --service-cluster-ip-range.
func StartKubeAPI(t testing.TB, lab *Lab, addr netip.Addr, serviceRange string) *KubeAPI {
	t.Helper()
	k := &KubeAPI{lab: lab, dir: filepath.Join(lab.Dir, "kube"), bins: KubeTools(t), addr: addr}
	if err := os.MkdirAll(filepath.Join(k.dir, "certs"), 0o700); err != nil {
		t.Fatalf("kube dir: %v", err)
	}
	k.port = freePort(t, addr)
	k.URL = "https://" + net.JoinHostPort(addr.String(), strconv.Itoa(k.port))
	k.writeCredentials(t)

	etcdPorts := [2]int{freePort(t, netip.MustParseAddr("127.0.0.1")), freePort(t, netip.MustParseAddr("127.0.0.1"))}
	k.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", etcdPorts[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", etcdPorts[1])
	k.etcd = lab.StartRoot(t, "etcd", filepath.Join(k.bins, "etcd"),
		"--name", "default",
		"--data-dir", filepath.Join(k.dir, "etcd"),
		"--listen-client-urls", k.etcdURL, "--advertise-client-urls", k.etcdURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "default="+peer,
		"--log-level", "warn")

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(k.CA)
	k.client = &http.Client{
		Timeout:   20 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	k.startAPIServer(t, serviceRange)
	return k
}

func (k *KubeAPI) startAPIServer(t testing.TB, serviceRange string) {
	t.Helper()
	start := time.Now()
	c := filepath.Join(k.dir, "certs")
	k.apiserver = k.lab.StartRoot(t, "kube-apiserver", filepath.Join(k.bins, "kube-apiserver"),
		"--etcd-servers", k.etcdURL,
		"--bind-address", k.addr.String(),
		"--advertise-address", k.addr.String(),
		"--secure-port", strconv.Itoa(k.port),
		"--endpoint-reconciler-type", "none",
		"--cert-dir", c,
		"--tls-cert-file", filepath.Join(c, "serving.crt"),
		"--tls-private-key-file", filepath.Join(c, "serving.key"),
		"--client-ca-file", filepath.Join(c, "ca.crt"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(c, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(c, "sa.key"),
		"--token-auth-file", filepath.Join(c, "tokens.csv"),
		"--authorization-mode", "RBAC",
		"--service-cluster-ip-range", serviceRange,
		"--anonymous-auth=false",
		"--v", "1")
	Eventually(t, 90*time.Second, 200*time.Millisecond, "kube-apiserver ready", func() error {
		if k.apiserver.Exited() {
			t.Fatalf("kube-apiserver exited:\n%s", k.apiserver.Tail(30))
		}
		body, code, err := k.do(http.MethodGet, "/readyz", "", nil)
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readyz: %d %s", code, lastLines(string(body), 5))
		}
		return nil
	})
	t.Logf("kube-apiserver ready at %s after %v", k.URL, time.Since(start).Round(time.Millisecond))
}

// Stop stops the API server (etcd keeps running, so a restart finds the same objects).
func (k *KubeAPI) Stop(t testing.TB) {
	t.Helper()
	if err := k.apiserver.Stop(10 * time.Second); err != nil && !k.apiserver.Exited() {
		t.Fatalf("stop kube-apiserver: %v", err)
	}
}

// Restart starts the API server again after Stop, on the same address.
func (k *KubeAPI) Restart(t testing.TB, serviceRange string) {
	t.Helper()
	k.startAPIServer(t, serviceRange)
}

// writeCredentials writes a CA, a serving certificate for the API server's address, the
// service-account signing key and the static admin token.
func (k *KubeAPI) writeCredentials(t testing.TB) {
	t.Helper()
	c := filepath.Join(k.dir, "certs")
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("ca key: %v", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "edgewire-e2e-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("ca cert: %v", err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	k.CA = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("serving key: %v", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IP(k.addr.AsSlice()), net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("serving cert: %v", err)
	}
	srvKeyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatalf("serving key: %v", err)
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatalf("service-account key: %v", err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatalf("service-account key: %v", err)
	}
	var tok [16]byte
	if _, err := rand.Read(tok[:]); err != nil {
		t.Fatalf("admin token: %v", err)
	}
	k.adminToken = hex.EncodeToString(tok[:])
	files := map[string][]byte{
		"ca.crt":      k.CA,
		"serving.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		"serving.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: srvKeyDER}),
		"sa.key":      pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"sa.pub":      pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"tokens.csv":  []byte(k.adminToken + ",e2e-admin,e2e-admin,system:masters\n"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(c, name), data, 0o600); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
	}
}

// freePort returns a TCP port free on addr now.
func freePort(t testing.TB, addr netip.Addr) int {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(addr.String(), "0"))
	if err != nil {
		t.Fatalf("free port on %s: %v", addr, err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// do sends one request as the admin and returns the body and status code.
func (k *KubeAPI) do(method, path, contentType string, body []byte) ([]byte, int, error) {
	return k.doAs(k.adminToken, method, path, contentType, body)
}

func (k *KubeAPI) doAs(token, method, path, contentType string, body []byte) ([]byte, int, error) {
	req, err := http.NewRequest(method, k.URL+path, bytes.NewReader(body))
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return data, resp.StatusCode, err
}

// KubeObject is the identity of one object of a manifest.
type KubeObject struct {
	APIVersion, Kind, Namespace, Name string
}

func (o KubeObject) String() string {
	if o.Namespace != "" {
		return fmt.Sprintf("%s %s/%s", o.Kind, o.Namespace, o.Name)
	}
	return fmt.Sprintf("%s %s", o.Kind, o.Name)
}

// clusterScoped are the kinds without a namespace that the tests use.
var clusterScoped = map[string]bool{
	"Namespace": true, "Node": true, "ClusterRole": true, "ClusterRoleBinding": true,
}

// Path returns the object's REST path (kinds whose plural is kind+"s", which is every kind the
// tests use).
func (o KubeObject) Path() string {
	prefix := "/apis/" + o.APIVersion
	if !strings.Contains(o.APIVersion, "/") {
		prefix = "/api/" + o.APIVersion
	}
	plural := strings.ToLower(o.Kind) + "s"
	if clusterScoped[o.Kind] || o.Namespace == "" {
		return prefix + "/" + plural + "/" + o.Name
	}
	return prefix + "/namespaces/" + o.Namespace + "/" + plural + "/" + o.Name
}

// Apply server-side-applies every document of manifest (YAML, "---"-separated) as the admin,
// giving namespaced objects without a namespace defaultNS. dryRun asks the server to validate
// and admit without storing. It returns the objects applied.
func (k *KubeAPI) Apply(t testing.TB, manifest, defaultNS string, dryRun bool) []KubeObject {
	t.Helper()
	objs, err := k.apply(manifest, defaultNS, dryRun)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func (k *KubeAPI) apply(manifest, defaultNS string, dryRun bool) ([]KubeObject, error) {
	dec := yaml.NewDecoder(strings.NewReader(manifest))
	var out []KubeObject
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			return out, nil
		} else if err != nil {
			return out, fmt.Errorf("apply: parse manifest: %w", err)
		}
		if doc == nil {
			continue
		}
		meta, _ := doc["metadata"].(map[string]any)
		o := KubeObject{APIVersion: fmt.Sprint(doc["apiVersion"]), Kind: fmt.Sprint(doc["kind"])}
		if meta != nil {
			o.Name, _ = meta["name"].(string)
			o.Namespace, _ = meta["namespace"].(string)
		}
		if !clusterScoped[o.Kind] && o.Namespace == "" {
			o.Namespace = defaultNS
			if meta != nil {
				meta["namespace"] = defaultNS
			}
		}
		body, err := json.Marshal(doc)
		if err != nil {
			return out, fmt.Errorf("apply %s: %w", o, err)
		}
		q := "?fieldManager=edgewire-e2e&force=true"
		if dryRun {
			q += "&dryRun=All"
		}
		resp, code, err := k.do(http.MethodPatch, o.Path()+q, "application/apply-patch+yaml", body)
		if err != nil {
			return out, fmt.Errorf("apply %s: %w", o, err)
		}
		if code/100 != 2 {
			return out, fmt.Errorf("apply %s: HTTP %d: %s", o, code, apiMessage(resp))
		}
		out = append(out, o)
	}
}

// Delete deletes the object at o, and succeeds when it does not exist.
func (k *KubeAPI) Delete(t testing.TB, o KubeObject) {
	t.Helper()
	resp, code, err := k.do(http.MethodDelete, o.Path(), "", nil)
	if err != nil {
		t.Fatalf("delete %s: %v", o, err)
	}
	if code/100 != 2 && code != http.StatusNotFound {
		t.Fatalf("delete %s: HTTP %d: %s", o, code, apiMessage(resp))
	}
}

// Get returns the object at o, decoded.
func (k *KubeAPI) Get(t testing.TB, o KubeObject) map[string]any {
	t.Helper()
	resp, code, err := k.do(http.MethodGet, o.Path(), "", nil)
	if err != nil {
		t.Fatalf("get %s: %v", o, err)
	}
	if code != http.StatusOK {
		t.Fatalf("get %s: HTTP %d: %s", o, code, apiMessage(resp))
	}
	var v map[string]any
	if err := json.Unmarshal(resp, &v); err != nil {
		t.Fatalf("get %s: %v", o, err)
	}
	return v
}

// CanI asks the API server whether the user of token may do verb on resource (group "" for the
// core group) in namespace ns (a SelfSubjectAccessReview).
func (k *KubeAPI) CanI(t testing.TB, token, verb, group, resource, ns, name string) bool {
	t.Helper()
	review := map[string]any{
		"apiVersion": "authorization.k8s.io/v1",
		"kind":       "SelfSubjectAccessReview",
		"spec": map[string]any{"resourceAttributes": map[string]any{
			"verb": verb, "group": group, "resource": resource, "namespace": ns, "name": name,
		}},
	}
	body, _ := json.Marshal(review)
	resp, code, err := k.doAs(token, http.MethodPost, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "application/json", body)
	if err != nil || code/100 != 2 {
		t.Fatalf("access review %s %s/%s: %v HTTP %d %s", verb, group, resource, err, code, apiMessage(resp))
	}
	var out struct {
		Status struct {
			Allowed bool `json:"allowed"`
		} `json:"status"`
	}
	if err := json.Unmarshal(resp, &out); err != nil {
		t.Fatalf("access review: %v", err)
	}
	return out.Status.Allowed
}

// ServiceAccountToken returns a token of ServiceAccount ns/name (a TokenRequest valid for an hour).
func (k *KubeAPI) ServiceAccountToken(t testing.TB, ns, name string) string {
	t.Helper()
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}`)
	resp, code, err := k.do(http.MethodPost, "/api/v1/namespaces/"+ns+"/serviceaccounts/"+name+"/token", "application/json", body)
	if err != nil || code/100 != 2 {
		t.Fatalf("token for ServiceAccount %s/%s: %v HTTP %d %s", ns, name, err, code, apiMessage(resp))
	}
	var tr struct {
		Status struct {
			Token string `json:"token"`
		} `json:"status"`
	}
	if err := json.Unmarshal(resp, &tr); err != nil || tr.Status.Token == "" {
		t.Fatalf("token for ServiceAccount %s/%s: %v %s", ns, name, err, resp)
	}
	return tr.Status.Token
}

// WriteKubeconfig writes a kubeconfig for token at path (mode 0600).
func (k *KubeAPI) WriteKubeconfig(t testing.TB, path, token string) {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: e2e
  user:
    token: %s
contexts:
- name: e2e
  context: {cluster: e2e, user: e2e}
current-context: e2e
`, k.URL, base64.StdEncoding.EncodeToString(k.CA), token)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatalf("write kubeconfig: %v", err)
	}
}

// apiMessage extracts the message of a Status body, or returns the body.
func apiMessage(body []byte) string {
	var st struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(body, &st) == nil && st.Message != "" {
		return st.Message
	}
	return lastLines(string(body), 5)
}
