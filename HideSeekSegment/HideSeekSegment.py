"""HideSeekSegment: lytic and blastic vertebral metastases in CT with Hide-and-Seek Attribution.

Four classes, one job each: the module (metadata, terminology), the widget (GUI only), the logic (everything
else, in ``HideSeekSegmentLib`` so that it runs without the Slicer application) and the self-test.
"""

import enum
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from HideSeekSegmentLib.logic import HideSeekLogic, describeProgress
from HideSeekSegmentLib.results import REPORT_REFERENCE_ROLE
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from hideseek.errors import Cancelled, HideSeekError

TERMINOLOGY_FILE = "HideSeekSegment-terminology.term.json"
MODEL_FOLDERS_SETTING = "HideSeekSegment/ModelFolders"
README_URL = "https://github.com/hideseeksegment/HideSeekSegment#readme"
PAPER_URL = "https://arxiv.org/abs/2512.06849"


class HideSeekSegment(ScriptedLoadableModule):
    """Module metadata; loads the lesion terminology once the application has started."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HideSeekSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["HideSeekSegment contributors"]
        self.parent.helpText = f"""
Finds lytic and blastic metastases in the vertebrae of a CT with Hide-and-Seek Attribution: a diffusion
autoencoder trained only on vertebra-level labels edits each vertebra towards a healthy one, and the regions whose
removal lowers the malignancy score are the lesions. Inputs: a CT and a vertebra segmentation (for example from
the TotalSegmentator extension). Results: a segmentation with a lytic and a blastic segment and a report table.
For research only, not for clinical use. See the <a href="{README_URL}">documentation</a>.
"""
        self.parent.acknowledgementText = f"""
Method: M. Atad et al., Hide-and-Seek Attribution, <a href="{PAPER_URL}">arXiv:2512.06849</a>.
Please cite it when you use this module.
"""
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self):
        """Make Slicer's terminology selector know the lytic/blastic modifiers used by the result segments."""
        if not hasattr(slicer.modules, "terminologies"):
            return
        path = Path(self.parent.path).parent / "Resources" / "Terminology" / TERMINOLOGY_FILE
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(path))


class Mode(enum.Enum):
    MID = "mid"
    VOLUME = "3d"

    def label(self):
        return "Mid-sagittal slice (as published)" if self is Mode.MID else "3-D (every sagittal slice)"


class Preset(enum.Enum):
    FAST = "fast"
    PUBLISHED = "published"

    def label(self):
        return "Fast" if self is Preset.FAST else "Published (slow)"


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA GPU"}[self.value]


@parameterNodeWrapper
class HideSeekSegmentParameterNode:
    """The module's settings, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    vertebrae: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]  # noqa: UP007 (the wrapper needs Union)
    outputSegmentation: vtkMRMLSegmentationNode
    mode: Mode = Mode.MID
    preset: Preset = Preset.FAST
    modelSensitivity: bool = True
    deltaThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    ddimSteps: Annotated[int, WithinRange(0, 250)] = 0  # 0: the preset's own
    minLesionVoxels: Annotated[int, WithinRange(0, 1000)] = 0  # 0: the engine's default
    searchEverySlice: bool = False
    device: Device = Device.AUTO


class HideSeekSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: shows the settings, starts and cancels runs, shows progress and results. No computation."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None
        self._cards = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HideSeekSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HideSeekSegmentLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.vertebraeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVertebraeChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.addModelFolderButton.clicked.connect(self.onAddModelFolder)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.reviewButton.clicked.connect(self.onReviewButton)

        self.showRunning(False)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        if self._run is not None:
            self._run.runner.cancel()
            self._run.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume is not None and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        if self._run is not None:
            return
        self.showModelSensitivity()
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.vertebrae)
        self.ui.applyButton.enabled = ready and self.ui.modelComboBox.count > 0
        self.ui.applyButton.toolTip = (
            "Find lytic and blastic metastases in the ticked vertebrae." if ready else "Choose a CT and its vertebrae."
        )

    # inputs and models ---------------------------------------------------------------------------------------

    def onVertebraeChanged(self, node):
        self.ui.vertebraListWidget.clear()
        self.ui.vertebraeInfoLabel.text = ""
        if node is None:
            return
        try:
            levels = self.logic.listVertebrae(node)
        except HideSeekError as exc:
            self.ui.vertebraeInfoLabel.text = str(exc)
            return
        for level in levels:
            item = qt.QListWidgetItem(level, self.ui.vertebraListWidget)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)

    def checkedLevels(self):
        """The ticked levels, or None when all are ticked (then vertebrae added later are processed too)."""
        items = [self.ui.vertebraListWidget.item(i) for i in range(self.ui.vertebraListWidget.count)]
        checked = [item.text() for item in items if item.checkState() == qt.Qt.Checked]
        return None if len(checked) == len(items) else checked

    def showModelSensitivity(self):
        """While "from the model" is ticked the slider is locked to the Δ the chosen model was tuned with."""
        p = self._parameterNode
        if p is None:
            return
        self.ui.deltaThresholdSliderWidget.enabled = not p.modelSensitivity
        card = self._cards.get(self.ui.modelComboBox.currentData)
        tuned = card.deltaThresholds.get(p.preset.value) if card is not None else None
        if p.modelSensitivity and tuned is not None and p.deltaThreshold != tuned:
            p.deltaThreshold = tuned

    def refreshModels(self, select=None):
        self.ui.modelComboBox.clear()
        self._cards = {}
        for card in self.logic.findModels(self.modelFolders()):
            self._cards[str(card.path)] = card
            self.ui.modelComboBox.addItem(card.title, str(card.path))
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, card.describe(), qt.Qt.ToolTipRole)
        if select is not None:
            self.ui.modelComboBox.setCurrentIndex(max(self.ui.modelComboBox.findData(str(select)), 0))
        self.onModelChanged()

    def modelFolders(self):
        """Folders the user added, kept in the application settings (a model is a per-computer choice)."""
        value = qt.QSettings().value(MODEL_FOLDERS_SETTING)
        return [value] if isinstance(value, str) else list(value or [])

    def onModelChanged(self, index=None):
        if self.ui.modelComboBox.count == 0:
            self.ui.modelCardBrowser.setPlainText("No model found: add a folder holding a model bundle.")
        else:
            tip = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex, qt.Qt.ToolTipRole)
            self.ui.modelCardBrowser.setPlainText(tip)
        self.onParameterNodeModified()

    def onAddModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Folder holding model bundles")
        if not folder:
            return
        found = self.logic.findModels([folder])
        if not found:
            slicer.util.errorDisplay(f"No model bundle (model.json + model.safetensors) in or below {folder}.")
            return
        qt.QSettings().setValue(MODEL_FOLDERS_SETTING, [*self.modelFolders(), folder])
        self.refreshModels(select=found[0].path)

    # running -------------------------------------------------------------------------------------------------

    def onApplyButton(self):
        if self._run is not None:
            self._run.runner.cancel()
            self.ui.statusLabel.text = "Cancelling…"
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if not self.confirmDependencies():
                return
            p = self._parameterNode
            self._run = self.logic.startRun(
                p.inputVolume,
                p.vertebrae,
                levels=self.checkedLevels(),
                mode=p.mode.value,
                model=self.ui.modelComboBox.currentData,
                preset=p.preset.value,
                deltaThreshold=None if p.modelSensitivity else p.deltaThreshold,
                device=p.device.value,
                ddimSteps=p.ddimSteps or None,
                minLesionVoxels=p.minLesionVoxels or None,
                searchEverySlice=p.searchEverySlice,
            )
            self.showRunning(True)
            self._timer.start()

    def confirmDependencies(self):
        """One confirmation that lists every package to install; the logic installs them."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        text = (
            "HideSeekSegment needs these Python packages, which are not installed yet:\n\n"
            + "\n".join(f"  {requirement}" for requirement in missing)
            + "\n\nInstall them now? This needs a network connection and can take several minutes "
            "(PyTorch is large)."
        )
        if not slicer.util.confirmOkCancelDisplay(text, "Install Python packages"):
            return False
        self.ui.statusLabel.text = "Installing Python packages…"
        slicer.app.processEvents()
        self.logic.installDependencies(missing)
        return True

    def onPoll(self):
        for event in self._run.runner.poll():
            self.ui.progressBar.value = int(event.get("percent") or 0)
            self.ui.statusLabel.text = describeProgress(event)
        if self._run.runner.running:
            return
        self._timer.stop()
        run, self._run = self._run, None
        self.showRunning(False)
        try:
            result = self.logic.finishRun(run, self._parameterNode.outputSegmentation)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was imported."
            return
        except Exception as exc:
            self.ui.statusLabel.text = f"Failed: {exc}"
            slicer.util.errorDisplay(f"The segmentation failed: {exc}")
            return
        self._parameterNode.outputSegmentation = result.segmentation
        self.showResult(result.table)
        self.showOnViews(result)
        lesions = len(result.report["lesions"])
        self.ui.statusLabel.text = f"Done: {lesions} lesion{'s' if lesions != 1 else ''} found."

    def showRunning(self, running):
        self.ui.applyButton.text = "Cancel" if running else "Segment metastases"
        self.ui.applyButton.toolTip = "Stop the run; nothing is imported." if running else ""
        if running:
            self.ui.applyButton.enabled = True
        for section in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                        self.ui.settingsCollapsibleButton, self.ui.outputsCollapsibleButton):
            section.enabled = not running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting…"
        else:
            self.onParameterNodeModified()

    # results -------------------------------------------------------------------------------------------------

    def onOutputChanged(self, node):
        self.showResult(node.GetNodeReference(REPORT_REFERENCE_ROLE) if node is not None else None)

    def showResult(self, table):
        self.ui.resultsTableView.setMRMLTableNode(table)
        self.ui.reviewButton.enabled = table is not None

    def showOnViews(self, result):
        """The CT under the new segments, and every slice view centred on the first lesion (if any)."""
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=True)
        result.segmentation.GetDisplayNode().SetVisibility(True)
        if result.report["lesions"]:
            r, a, s = result.report["lesions"][0]["centroid_ras"]
            slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

    def onReviewButton(self):
        segmentation = self._parameterNode.outputSegmentation
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)


class HideSeekSegmentLogic(ScriptedLoadableModuleLogic, HideSeekLogic):
    """The logic, with the worker run by PythonSlicer in Slicer's startup environment."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        HideSeekLogic.__init__(
            self,
            pythonCommand=[shutil.which("PythonSlicer") or "PythonSlicer"],
            environment=slicer.util.startupEnvironment(),
            workRoot=slicer.app.temporaryPath,
        )

    def getParameterNode(self):
        return HideSeekSegmentParameterNode(super().getParameterNode())


class HideSeekSegmentTest(ScriptedLoadableModuleTest):
    """Self-test on a synthetic phantom: vertebra listing, result import, and a full run when a model is present."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_vertebrae_are_listed_and_exported()
        self.setUp()
        self.test_results_are_imported()
        self.setUp()
        self.test_process_end_to_end()

    def test_vertebrae_are_listed_and_exported(self):
        from HideSeekSegmentLib.phantom import makePhantom

        phantom = makePhantom(slicer.mrmlScene)
        logic = HideSeekSegmentLogic()
        self.assertEqual(logic.listVertebrae(phantom.vertebrae), ["L1", "L2"])
        with tempfile.TemporaryDirectory() as folder:
            exported = logic.exportInputs(phantom.ct, phantom.vertebrae, folder)
            self.assertEqual(exported.levels, ("L1", "L2"))
            self.assertTrue(exported.ct.is_file() and exported.vertebrae.is_file())

    def test_results_are_imported(self):
        import json

        import numpy as np
        from HideSeekSegmentLib import results, volumes
        from HideSeekSegmentLib.phantom import makePhantom

        phantom = makePhantom(slicer.mrmlScene)
        with tempfile.TemporaryDirectory() as folder:
            volumes.writeLabelArray(phantom.lytic.astype(np.uint8), phantom.ct, Path(folder) / results.LESIONS_FILE)
            report = {"vertebrae": [{"level": "L1", "status": "ok", "n_lytic": 1, "n_blastic": 0}],
                      "lesions": [{"vertebra": "L1", "type": "lytic", "delta": 0.8, "volume_mm3": 100.0,
                                   "centroid_ras": [0.0, 0.0, 0.0]}]}
            (Path(folder) / results.REPORT_FILE).write_text(json.dumps(report), encoding="utf-8")
            imported = results.importResults(folder, phantom.ct)
        segmentation = imported.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        lytic = slicer.util.arrayFromSegmentBinaryLabelmap(imported.segmentation, "lytic", phantom.ct)
        self.assertTrue(np.array_equal(lytic > 0, phantom.lytic))
        self.assertEqual(imported.table.GetNumberOfRows(), 2)

    def test_process_end_to_end(self):
        logic = HideSeekSegmentLogic()
        missing = logic.missingDependencies()
        if missing or not logic.findModels():
            self.skipTest(f"needs a model bundle and {', '.join(missing) or 'no package'}: not installed here")
        from HideSeekSegmentLib.phantom import makePhantom

        phantom = makePhantom(slicer.mrmlScene)
        events = []
        result = logic.process(phantom.ct, phantom.vertebrae, model=logic.findModels()[0].path,
                               progress=events.append)
        self.assertTrue(events)
        self.assertEqual(result.segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertEqual([v["level"] for v in result.report["vertebrae"]], ["L1", "L2"])
        self.assertEqual(result.segmentation.GetName(), f"{phantom.ct.GetName()} metastases")
        leftovers = [name for name in os.listdir(slicer.app.temporaryPath) if name.startswith("hideseek-")]
        self.assertEqual(leftovers, [])
